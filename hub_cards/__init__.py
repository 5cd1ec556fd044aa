"""Model cards of NPMs, built from data (installed as npm_hf.hub_cards)."""

from .model_card import NPMModelCardCallback, load_card_facts, render_model_card, update_model_card


__all__ = ["NPMModelCardCallback", "load_card_facts", "render_model_card", "update_model_card"]
