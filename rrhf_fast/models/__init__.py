"""Models: loading (`loading`), the shared-prompt attention (`attention`), the packed log-prob forward
(`logprobs`) and the tiny random-initialised models of the tests and the demo (`tiny`)."""
