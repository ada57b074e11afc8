"""The shard machinery every stage shares: reading and writing shards, resume, partitions, locks,
the column contract, run statistics and errors. Nothing here knows about models."""
