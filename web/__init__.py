"""The Falcon web service on top of the shm-embed client."""
