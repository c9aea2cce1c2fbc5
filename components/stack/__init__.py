"""The local stack: the processes `tandem up` starts, watches and `tandem down` stops."""
