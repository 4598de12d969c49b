"""Everything that touches vLLM: the plugin's hooks, GriffinMLP, serving flags, metrics, compatibility."""
