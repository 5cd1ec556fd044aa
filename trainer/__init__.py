"""Training NPMs (collator, loss, Trainer): see the training issue. Installed as npm_hf.trainer."""
