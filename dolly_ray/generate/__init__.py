"""Generation engines without Ray: the instruction generator (continuous and static batching), the response cut, the vllm engine's settings, and scoring of answers."""
