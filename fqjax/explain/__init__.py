"""Why quantization hurts some groups more: the forward chain and the optimization state (curvature)."""
from fqjax.explain.curvature import (check_weight_only, dequantized_params, group_gradient_norms,
                                     group_mean_sample_gradient_norms, group_top_eigenvalues, make_hvp)
from fqjax.explain.hvp import BatchedHvp, group_hvp
from fqjax.explain.lanczos import (hutchinson_trace, lanczos_top_eigenvalues, lanczos_top_eigenvalues_many,
                                   power_iteration)

__all__ = ["BatchedHvp", "check_weight_only", "dequantized_params", "group_gradient_norms", "group_hvp",
           "group_mean_sample_gradient_norms", "group_top_eigenvalues", "make_hvp", "hutchinson_trace",
           "lanczos_top_eigenvalues", "lanczos_top_eigenvalues_many", "power_iteration"]
