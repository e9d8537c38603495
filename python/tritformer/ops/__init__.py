"""Autograd / custom-op layer."""
