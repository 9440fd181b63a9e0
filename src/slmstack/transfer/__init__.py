"""Data-efficient transfer studies: task collections, held-out splits, training modes and the grid."""
