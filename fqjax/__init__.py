"""fqjax: measure, explain and mitigate the disparate impact of quantization on minority groups."""

__version__ = "0.1.0"
