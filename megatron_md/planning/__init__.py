"""Cluster cost model: what each optimizer costs per rank and step at a given layout."""
