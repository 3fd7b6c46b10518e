"""Running the job: process start and exit across ranks, shared memory of loader workers, start-up checks,
checkpoint files on disk."""
