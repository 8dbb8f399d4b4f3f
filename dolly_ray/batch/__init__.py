"""Ray Data jobs over datasets: batch generation (hf actor pool or ray.data.llm) and evaluation."""
