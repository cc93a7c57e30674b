"""custom-app: FedMUD with your own model and data."""
