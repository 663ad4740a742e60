"""The precision-service loop: catalogue, requests and their lifecycle, needs, plans, evaluation."""
