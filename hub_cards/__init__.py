"""Model cards of NPMs, built from data, and Hub uploads (installed as npm_hf.hub_cards)."""

from .hub import IGNORE_PATTERNS, push_to_hub
from .model_card import NPMModelCardCallback, load_card_facts, render_model_card, update_model_card


__all__ = ["IGNORE_PATTERNS", "NPMModelCardCallback", "load_card_facts", "push_to_hub", "render_model_card",
           "update_model_card"]
