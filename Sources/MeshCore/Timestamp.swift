#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// RFC 3339 times in UTC, second precision, as Kubernetes writes them (`2026-11-25T19:57:36Z`).
public enum Timestamp {
    public static func now() -> String { format(secondsSinceEpoch: Int(time(nil))) }

    public static func format(secondsSinceEpoch s: Int) -> String {
        var t = time_t(s)
        var tm = tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(tm.tm_year + 1900)-\(two(tm.tm_mon + 1))-\(two(tm.tm_mday))T"
            + "\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec))Z"
    }

    /// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, or nil.
    public static func parse(_ s: String) -> Int? {
        let u = Array(s.utf8)
        func num(_ r: Range<Int>) -> Int? {
            guard r.upperBound <= u.count else { return nil }
            var v = 0
            for i in r {
                guard (48...57).contains(u[i]) else { return nil }
                v = v * 10 + Int(u[i] - 48)
            }
            return v
        }
        guard u.count >= 20, u[4] == 45, u[7] == 45, u[10] == 84 || u[10] == 116, u[13] == 58, u[16] == 58,
            let y = num(0..<4), let mo = num(5..<7), let d = num(8..<10), let h = num(11..<13),
            let mi = num(14..<16), let se = num(17..<19), (1...12).contains(mo), (1...31).contains(d),
            h < 24, mi < 60, se < 61
        else { return nil }
        var i = 19
        if u[i] == 46 {  // fraction
            i += 1
            let start = i
            while i < u.count, (48...57).contains(u[i]) { i += 1 }
            guard i > start else { return nil }
        }
        var offset = 0
        guard i < u.count else { return nil }
        if u[i] == 90 || u[i] == 122 {
            guard i + 1 == u.count else { return nil }
        } else if u[i] == 43 || u[i] == 45, i + 6 == u.count, u[i + 3] == 58, let oh = num(i + 1..<i + 3),
            let om = num(i + 4..<i + 6)
        {
            offset = (oh * 3600 + om * 60) * (u[i] == 43 ? 1 : -1)
        } else {
            return nil
        }
        // Days from civil (Howard Hinnant's algorithm).
        let yy = mo <= 2 ? y - 1 : y
        let era = (yy >= 0 ? yy : yy - 399) / 400
        let yoe = yy - era * 400
        let doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146097 + doe - 719468
        return days * 86400 + h * 3600 + mi * 60 + se - offset
    }
}
