"""One module per IPC channel; each turns its channel into raw entries and can be stopped."""
