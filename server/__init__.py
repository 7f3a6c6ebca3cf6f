"""Server side: the SuperLink process, the ServerApp, enrolment and run folders."""
