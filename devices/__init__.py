"""Device drivers (ZVT payment terminals, Modbus locker boards) and their simulators."""
