"""Built-in jobs run by the CLI (the main MNIST training job)."""
