"""Ray Serve: the hf engine's deployment, the vllm engine's app, and the OpenAI protocol both speak."""
