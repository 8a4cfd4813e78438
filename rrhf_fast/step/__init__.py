"""One optimizer step, as the loop runs it and the planner simulates it: which queries and micro-batches
it trains (`steps`), and their forward and backward under the training autocast (`backward`)."""
