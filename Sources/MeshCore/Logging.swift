import Logging
import Synchronization

/// Logging set up the same way in every executable: readable lines on stderr at the chosen level.
public enum MeshLogging {
    private static let bootstrapped = Mutex(false)

    public static func bootstrap(level: Logger.Level) {
        let first = bootstrapped.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
