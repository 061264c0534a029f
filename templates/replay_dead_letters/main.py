"""Flex Template entry point: runs ``pipelines.replay_dead_letters`` with the launcher's arguments."""

from pipelines.replay_dead_letters import main

if __name__ == "__main__":
    main()
