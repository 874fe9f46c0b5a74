"""`oppu-deploy`: the federated run on real Flower processes (SuperLink, SuperNodes, `flwr run`)."""
