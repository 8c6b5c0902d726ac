"""The fedptr worker node: a process that registers under a name, keeps an object store, runs
allow-listed torch operations where the data lives and forwards operations down pointer chains."""
