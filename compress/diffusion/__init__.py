"""Noise schedules, samplers and classifier-free guidance."""
