"""mitmdump -s addons/regcache.py — the regcache pull-through cache for container registries.

A thin shim: mitmproxy loads -s scripts outside sys.modules, so the logic lives in the
installed package `regcachelib` (pip install -e .).
"""

from regcachelib.addon import RegistryCache

addons = [RegistryCache()]
