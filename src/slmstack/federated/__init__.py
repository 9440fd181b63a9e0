"""Federated LoRA fine-tuning of pruned building blocks on Flower (LEGO, arXiv 2410.18287).

Modules: ``config`` (the federation YAML), ``data`` (records and seeded partitions), ``lora`` (LoRA
factors, dense updates, masks, rank return), ``strategies`` (fedavg, heterofl, lego on Flower's
``FedAvg``), ``client_app`` / ``server_app`` (Flower apps) and ``run`` (simulation and outputs).
Importing this package does not import Flower; the apps and strategies do.
"""
