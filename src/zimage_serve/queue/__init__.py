"""The queue: its contract (`contract.JobQueue`), the job (`jobs`), and the two that keep it, peers
behind that contract: one machine's SQLite file (`sqlite_queue`) and a cluster's Redis (`redis_queue`);
`backends` says which one a server uses."""
