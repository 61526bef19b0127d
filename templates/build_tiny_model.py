"""Placeholder: replaced by the tiny-model builder."""
