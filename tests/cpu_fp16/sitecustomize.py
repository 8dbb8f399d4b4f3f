"""Test-only: DeepSpeed's CPU accelerator declares fp16 supported, so the v100 preset (fp16
with dynamic loss scaling) can be rehearsed on CPUs without AVX512-FP16.

Put this directory on PYTHONPATH for a job and every Python process of it, Ray's
workers included, imports it at start-up. DeepSpeed is patched when it is first
imported, so processes that never import it pay nothing.
"""

import importlib.abc
import importlib.util
import sys

_MODULE = "deepspeed.accelerator.cpu_accelerator"


class _DeclareFp16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.CPU_Accelerator.is_fp16_supported = lambda self: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _DeclareFp16())
