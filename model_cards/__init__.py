"""Model card templates, installed as `onepeace_hf.model_cards` (see pyproject.toml); rendered by
`onepeace_hf.model_card`. A package rather than loose data so that `importlib.resources` finds the templates in a
wheel and in an editable install alike."""
