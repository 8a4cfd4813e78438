"""Models: loading (`loading`), the tokenizer helpers (`tokenizer`), the shared-prompt attention
(`attention`), the packed log-prob forward (`logprobs`), peft unwrapping and eval mode (`wrapping`),
and the tiny random-initialised models of the tests and the demo (`tiny`)."""

from rrhf_fast.models.wrapping import eval_mode, unwrap

__all__ = ["eval_mode", "unwrap"]
