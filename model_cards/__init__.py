"""Model card templates, shipped inside the wheel as `lisa_peft.model_cards` (see setup.cfg)."""
