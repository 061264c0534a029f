"""Flex Template entry point: runs ``pipelines.streaming_to_tinybird`` with the launcher's arguments."""

from pipelines.streaming_to_tinybird import main

if __name__ == "__main__":
    main()
