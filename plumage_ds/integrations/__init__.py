"""Thin adapters to training engines. Heavy imports (deepspeed, ...) stay lazy:
import ``plumage_ds.integrations.deepspeed`` explicitly to use the DeepSpeed adapter."""
