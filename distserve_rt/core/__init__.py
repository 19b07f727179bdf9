"""Requests, the paged KV pool and its block manager, schedulers."""
