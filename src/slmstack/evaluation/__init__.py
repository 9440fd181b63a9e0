"""Zero-shot evaluation of models, model + adapter, and stacks; numbers identical to lm-evaluation-harness."""
