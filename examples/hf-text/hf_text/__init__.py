"""hf-text: FedMUD fine-tunes a Hugging Face sequence classifier on text, through the config alone."""
