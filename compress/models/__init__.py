"""What a DiT is: the native model, family adapters, and loading."""
