"""hotreload publisher: the per-pod watcher daemon and the operator CLI."""
