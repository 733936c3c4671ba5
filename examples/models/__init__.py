"""Networks: the reference DeepLabv3+ with FPA and EPA, its encoders, and the protocol a custom
network follows to train in the full trainer."""
