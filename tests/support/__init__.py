"""What the tests share: servers (in this process or real ones), jobs, tokens, checkpoints, browsers."""
