"""Pipeline stages: plan partitions, read and decode, embed and score, write outputs."""
