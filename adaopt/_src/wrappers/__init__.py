"""What wraps any optimizer without changing its step: iterate averaging."""
