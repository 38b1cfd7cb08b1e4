"""Publishing exported releases (local directory targets; S3 and the Hub come with the publish issue)."""
