"""The weight store fetches through the one fetcher of the core layer (:mod:`vaeft.fetch`)."""

from vaeft.fetch import DigestMismatchError, DownloadError, Fetched, Progress, TooLargeError, fetch, fetch_bytes

__all__ = ["DigestMismatchError", "DownloadError", "Fetched", "Progress", "TooLargeError", "fetch", "fetch_bytes"]
