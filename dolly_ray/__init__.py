"""Dolly-style instruction tuning on Ray, one folder per stage: ``records`` (data in),
``train`` (Ray Train + DeepSpeed ZeRO-3), ``generate`` (the generators, no Ray),
``serve`` (Ray Serve, OpenAI-compatible) and ``batch`` (Ray Data jobs over datasets).
The modules beside them are what every stage shares; ``demo`` runs the whole path."""
