"""UNet-NAS proxies: what a candidate U-Net costs (params, MACs, latency) and how good it looks.

Imports go one way: ``nas`` -> ``proxies`` -> ``search_spaces``.
"""

from .cost import ArchCost, Cost, arch_costs, constraint_filter, count_macs, count_params

__all__ = ["ArchCost", "Cost", "arch_costs", "constraint_filter", "count_macs", "count_params"]
