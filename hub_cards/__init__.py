"""Model cards of NPMs, built from data, and Hub uploads (installed as npm_hf.hub_cards)."""

from .hub import HUB_MAX_FILE_BYTES, check_file_sizes, push_to_hub, update_config_file, upload_plan
from .model_card import EXAMPLE as CARD_EXAMPLE
from .model_card import NPMModelCardCallback, load_card_facts, mask_token_of, render_model_card, update_model_card


__all__ = ["CARD_EXAMPLE", "HUB_MAX_FILE_BYTES", "NPMModelCardCallback", "check_file_sizes", "load_card_facts",
           "mask_token_of", "push_to_hub", "render_model_card", "update_config_file", "update_model_card",
           "upload_plan"]
