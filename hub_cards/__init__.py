"""Model cards and Hub push/pull for NPMs. Installed as npm_hf.hub_cards."""
