"""Downstream analyses that run as block tasks over a generated store's chunk grid."""
